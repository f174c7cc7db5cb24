fn main() {
    println!("provcache: under construction");
}
